"""One module per claim of the article (../shared/SEED.md), each defining ``CLAIM``."""
