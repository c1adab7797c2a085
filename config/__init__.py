"""The configuration every layer reads: the HISTO_* settings, read once (`config.settings`), and the CPUs
this process may use (`config.cpus`). It imports only `models` constants, so the service, slides and
the slide engine's workers and CLIs all read the same settings without importing upwards.
"""
