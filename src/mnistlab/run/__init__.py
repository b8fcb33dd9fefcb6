"""A run directory: the one run driver (:mod:`.driver`), the directory's files (:mod:`.rundir`),
checkpoints (:mod:`.checkpoint`), the pictures and the summary (:mod:`.summary`)."""
