from rempctl.main import main

main()
