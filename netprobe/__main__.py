from netprobe.cli import main

raise SystemExit(main())
