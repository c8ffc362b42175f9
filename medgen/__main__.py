from medgen.cli import main

raise SystemExit(main())
