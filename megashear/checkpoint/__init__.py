"""megashear's checkpoint format, shared by the trainer and the converters.

``format``      directory names, the tracker, ``megashear.json``, resolve, :class:`CheckpointError`
``dist_files``  the ``dist_checkpointing`` files of one checkpoint: metadata, damage, loading
``publish``     atomic publication (``*.tmp`` then rename, tracker last), rotation, output checks
``model_state`` the weights of in-memory megatron-core models saved and loaded at any layout
``pruning_record`` the typed pruning record of a pruning checkpoint's ``megashear.json``
``dist_stream``  megatron-core ``torch_dist`` checkpoints written and read one tensor at a time
``megatron_layout`` canonical weights <-> megatron-core ``GPTModel`` tensors (local spec)

The streaming reader and writer live here so that finalisation (:mod:`megashear.jobs.finalize`)
stands on this package and :mod:`megashear.pruning` alone, and conversion on this one.

This package imports only :mod:`megashear.model_config`, torch and megatron-core: training and
conversion both stand on it and neither imports the other.
"""
