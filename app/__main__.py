"""`python -m app`: serve with uvicorn, configured from the settings."""

from app.server.run import main

main()
