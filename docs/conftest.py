# The docs' pages are doctests (`make test-new` passes docs/*.md); this helper is
# mkdocs' (it imports griffe, from the `docs` extra), not a test module.
collect_ignore = ["_griffe_examples.py"]
