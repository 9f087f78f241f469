"""The error every config check raises (its own module so that method modules and the config, which asks
the methods what they support, can both import it without importing each other)."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is accepted."""
