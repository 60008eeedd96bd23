"""Integrations with libraries users already run (PEFT, ...): above the API, below the apps."""
