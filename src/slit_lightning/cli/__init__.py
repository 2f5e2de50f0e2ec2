"""The ``slit`` command tree (:func:`slit_lightning.cli.main.main`)."""
