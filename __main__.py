from s1fast.cli import main

raise SystemExit(main())
