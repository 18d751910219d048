from genserve.cli import main

raise SystemExit(main())
