"""VAR's scale-wise transformer with the causal (VAR) and markov (SRDD) attention masks."""
