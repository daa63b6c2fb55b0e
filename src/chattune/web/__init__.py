"""The web app (`chattune web`): labeling, training monitor and playground on one workspace."""
