"""Tasks (synthetic arithmetic, GSM8K), prompts, labelers and the preference store."""
