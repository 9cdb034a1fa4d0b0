class UserError(ValueError):
    """Bad input from the user (config, paths, data). The CLI prints it as one line and exits with 2."""
