"""megashear's checkpoint format, shared by the trainer and the converters.

``format``      directory names, the tracker, ``megashear.json``, resolve, :class:`CheckpointError`
``dist_files``  the ``dist_checkpointing`` files of one checkpoint: metadata, damage, loading
``publish``     atomic publication (``*.tmp`` then rename, tracker last), rotation, output checks
``model_state`` the weights of in-memory megatron-core models saved and loaded at any layout
``pruning_record`` the typed pruning record of a pruning checkpoint's ``megashear.json``

This package imports only :mod:`megashear.model_config`, torch and megatron-core: training and
conversion both stand on it and neither imports the other.
"""
