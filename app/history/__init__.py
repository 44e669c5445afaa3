"""History that outlives Redis: every published tick and every candle, kept in the database
for `HISTORY_DAYS`, behind the fast retention window (app/prices/store.py)."""
