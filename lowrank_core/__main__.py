from .cli import main
from .threads import configure_threads

configure_threads()  # the cores that are free now (LOWRANK_THREADS overrides); a launch re-divides them per process
raise SystemExit(main())
