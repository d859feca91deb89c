"""Task data: the example record, loaders for real files, prompt templates."""
