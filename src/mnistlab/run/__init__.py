"""A run directory: the one run driver (:mod:`.driver`), the directory's files (:mod:`.rundir`),
checkpoints (:mod:`.checkpoint`), the summary (:mod:`.summary`) and the pictures (:mod:`.pictures`)."""
