"""The checkpoint core: options, the service, the step directory and its commit, reading steps, retention and save policies, Orbax tuning."""
