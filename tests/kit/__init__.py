"""The test kit: every helper the test folders share, one module per family.

- :mod:`kit.qemu` — QEMU's tools: where QEMU 10.0 is; ``qemu-img``/``qemu-io`` to make,
  check, compare, map and inspect images.
- :mod:`kit.chains` — image chains on disk, their ``blockdev-add`` arguments, and opening
  them in-process.
- :mod:`kit.daemons` — blockd and qemu-storage-daemon processes (started, waited for,
  stopped) and blockd in-process (a command harness, a served socket).
- :mod:`kit.compare` — the same commands run by QEMU's daemon and by blockd, answers
  compared.
- :mod:`kit.qmp` — QMP clients (blocking, trio, qemu.qmp's), event collection, framing.
- :mod:`kit.cli` — the ``blockd``/``blockctl`` command lines and the example scripts.
- :mod:`kit.schema` — the ``schema/`` files judged by jsonschema, values made from them,
  libvirt's schema probe.
- :mod:`kit.fakes` — fakes for the job engine's unit tests.
- :mod:`kit.host` — host resources: a small tmpfs, filling a disk, lock bytes.
- :mod:`kit.repo` — the repository's folders and its packages that are not installed.

Imported as ``kit`` (``pyproject.toml`` puts ``tests/`` on ``sys.path``). Fixtures built on
it live in the ``conftest.py`` files; test modules import helpers from here, never from a
``conftest.py`` or from one another.
"""
