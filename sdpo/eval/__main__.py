from sdpo.eval.cli import main

raise SystemExit(main())
