"""How one configuration value is read, the same from the TOML file and from a flag (which arrives as a string):
each parser returns the typed value or raises ValueError with what was wrong; config.py names the key."""
from __future__ import annotations

import re
from typing import Any, Callable


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "64MiB", "2G", "1.5GB" (K/M/G/T alone are binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", value, re.IGNORECASE)
        if not match:
            raise ValueError(f"{value!r} is not a size (examples: 67108864, 64MiB, 2G, 1.5GB)")
        number, unit, binary, byte = match.groups()
        power = "KMGT".find(unit.upper()) + 1 if unit else 0
        base = 1000 if unit and byte and not binary else 1024
        size = int(float(number) * base ** power)
    else:
        raise ValueError(f"{value!r} is not a size")
    if size < 0:
        raise ValueError(f"a size cannot be negative: {value!r}")
    return size


def parse_devices(value: Any) -> list[int]:
    """CUDA device ids from a list or from "0,1,2,3"; "" is none (CPU workers)."""
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError(f"{value!r} is not a device list (example: 0,1,2,3)")
    try:
        devices = [int(v) for v in items if not isinstance(v, (bool, float))]
    except ValueError:
        raise ValueError(f"{value!r} is not a device list (example: 0,1,2,3)") from None
    if len(devices) != len(items) or any(d < 0 for d in devices):
        raise ValueError(f"{value!r}: device ids are non-negative integers")
    if len(set(devices)) != len(devices):
        raise ValueError(f"{value!r} names a device twice")
    return devices


def strict(kind: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and kind is not str:
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"expected {kind.__name__}, got {value!r}")
        return value
    return parse


def group_name(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)  # a gid
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"{value!r} is not a group name or gid")


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"{value!r} is not true or false")


def topology_names(value: Any) -> list[str]:
    """"TP4PP1,TP2PP2" or a list of such names → normalised names."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"{value!r} is not a list of topologies such as TP4PP1,TP2PP2")
    names = []
    for item in items:
        match = re.fullmatch(r"TP(\d+)PP(\d+)", str(item).strip().upper())
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"{item!r} is not a topology such as TP2PP2")
        names.append(f"TP{int(match[1])}PP{int(match[2])}")
    return names


def positive(value: Any) -> float:
    number = strict(float)(value)
    if not number > 0:
        raise ValueError(f"{value!r} must be greater than 0")
    return number


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else parse(value)
