"""The command line: `main.py` holds the verb table; each verb is one thin file here that parses its config and
calls the library or an experiment."""
