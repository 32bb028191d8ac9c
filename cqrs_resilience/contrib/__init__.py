"""Integrations with web frameworks, each in its own module behind its own extra:
`cqrs_resilience.contrib.starlette` (`pip install 'cqrs-resilience[starlette]'`)."""
