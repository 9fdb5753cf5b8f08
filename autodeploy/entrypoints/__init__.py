"""User entry points: the ``LLM`` class, the command line, the demo and the benchmark driver."""
