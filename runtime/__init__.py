"""runtime: the ``rafs`` command line and the container runtime on runc.

- the command line: ``cli`` (every subcommand's parser, the fused/converter/rafs
  ones registered from their packages), ``console`` (one-line errors, exit
  statuses, logging, a closed stdout), ``errors`` (the RuntimeError tree and
  the exit-status table);
- ``rafs run``: ``run`` (the container's lifecycle), ``image`` and ``imagemount``
  (the image: a shared lazy RAFS mount, or an unpacked plain image), ``overlay``
  (the writable layer), ``spec`` (the OCI runtime spec), ``runc``,
  ``executable`` (docker's 126/127: is the command there and executable),
  ``users`` and ``rootpath`` (names and paths resolved inside the image's root);
- ``manage`` (``rafs ps``/``rm``), ``store`` (the containers' state), ``paths``
  (where the runtime keeps what), ``optimize`` (``rafs optimize``: run, trace,
  convert with the trace as prefetch list);
- ``unpack`` (the eager tree of a plain image, from the converter's layer
  model) and ``unpacked`` (those trees: ``rafs image ls``/``prune``).
"""
