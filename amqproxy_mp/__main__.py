from amqproxy_mp.cli import main

raise SystemExit(main())
