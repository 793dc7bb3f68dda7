"""The pre-copy ledger of a staged switch: only full blocks are copied ahead; the cut sends the rest."""
from rempd.engine.sampling_params import SamplingParams
from rempd.engine.sequence import Sequence
from rempd.migrate.delta import PrecopyLedger


def seq(name: str, blocks: list[int], computed: int, arrival: float) -> Sequence:
    s = Sequence(name, [1] * computed, SamplingParams(), seed=0, arrival=arrival)
    s.block_table, s.num_computed = list(blocks), computed
    return s


def test_full_blocks_are_precopied_and_the_partial_and_new_ones_form_the_delta():
    ledger = PrecopyLedger(block_size=4)
    a, b = seq("a", [7, 3, 9], 10, 0.0), seq("b", [5, 6], 8, 1.0)  # a: 2 full + 1 partial; b: 2 full
    assert ledger.next_chunk([b, a], max_blocks=3) == [7, 3, 5]  # oldest first, at most 3
    assert ledger.next_chunk([a, b], max_blocks=3) == [6]
    assert ledger.pending([a, b]) == []
    a.num_computed, b.num_computed = 13, 9  # decoding went on: a's block 9 filled, both got a new block
    a.block_table.append(2)
    b.block_table.append(8)
    layout = ledger.layout([a, b])
    assert layout.new_tables == [[0, 1, 2, 3], [4, 5, 6]]
    assert layout.precopied == {0: ([0, 1, 2], [0, 1, 4]), 1: ([0], [5])}
    assert (layout.delta_old, layout.delta_new) == ([9, 2, 8], [2, 3, 6])
    assert layout.num_precopied == 4 and ledger.num_copied == 4


def test_a_preempted_sequence_loses_its_copies_and_a_reused_block_id_is_not_mistaken():
    ledger = PrecopyLedger(block_size=4)
    a, b = seq("a", [1, 2], 8, 0.0), seq("b", [3], 4, 1.0)
    ledger.next_chunk([a, b], max_blocks=10)
    a.num_preemptions += 1  # preempted and recomputed into other blocks
    a.block_table = [4, 5]
    b.block_table = [3]  # same id, same sequence: still valid
    layout = ledger.layout([a, b])
    assert layout.precopied == {0: ([2], [2])}
    assert layout.delta_old == [4, 5]
    c = seq("c", [1], 4, 2.0)  # block 1 was a's, copied in chunk 0; c holds it now with other contents
    assert ledger.layout([c]).delta_old == [1]
