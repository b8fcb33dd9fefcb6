"""Using a trained run: the classifier and image preparation, export, the web service, the report."""
