"""softserve: serve many soft prompts over one frozen T5, batching rows of different tasks together."""
