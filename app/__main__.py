"""`python -m app`: serve with uvicorn, configured from the settings."""

from app.server import main

main()
