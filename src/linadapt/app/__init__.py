"""The application layer: the ``linadapt`` command, the demo, the HTML reports and the benchmark."""
