class UserError(Exception):
    """A problem with the user's input (paths, files, flags): printed as one clear
    message by the CLI, never as a traceback."""
