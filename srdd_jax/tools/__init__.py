"""Command-line tools: check_reference, convert_var."""
