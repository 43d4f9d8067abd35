"""Training, evaluation and checkpoint machinery behind the `transnext` CLI."""
