"""How the interventions of a run are computed: one :class:`~.base.Engine` per run, chosen after planning by
:func:`.select.choose_engine` among the candidates of :data:`.select.CANDIDATES` (the crop first, then each
candidate that can replace the engine chosen so far and verifies against it)."""
