"""The application layer: what each ``megashear`` command does, as functions of its config.

A job module builds the trainers, readers and writers a command needs and returns its result;
:mod:`megashear.cli` only parses, dispatches and reports errors in one line.
"""
