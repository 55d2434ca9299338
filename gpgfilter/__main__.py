from gpgfilter.process.cli import main

main()
