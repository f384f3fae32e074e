from sdpo.pairs.cli import main

raise SystemExit(main())
