from gpgfilter.cli import main

main()
