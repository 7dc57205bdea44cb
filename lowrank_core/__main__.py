from .cli import main
from .threads import configure_threads

configure_threads()  # a fixed count per machine (LOWRANK_THREADS=N or auto overrides); a launch re-divides it per process
raise SystemExit(main())
