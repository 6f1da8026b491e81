"""dlforge console: the web pages people use, served by ``dlforge up`` on the API's port."""
