"""pricefeed-client: typed access to a pricefeed service.

    from pricefeed_client import PricefeedClient

    async with PricefeedClient(url, client_id="…", client_secret="…") as feed:
        async for tick in feed.watch(["AAPL", "BTC-USD"]):
            print(tick.symbol, tick.seq, tick.price)   # str, int, Decimal

`SyncPricefeedClient` does the same from scripts and notebooks, without `async`.
"""

from pricefeed_client.client import PricefeedClient
from pricefeed_client.errors import (
    ApiError,
    CloseCode,
    NotEntitled,
    PolicyViolation,
    PricefeedError,
    ProtocolError,
    StreamRefused,
    Unauthorized,
    UnknownSymbol,
)
from pricefeed_client.events import Connected, Disconnected, Dropped, Gap, Reset, StreamEvent
from pricefeed_client.models import Candle, Symbol, Tick
from pricefeed_client.sync import SyncPricefeedClient
from pricefeed_client.tokens import AccessToken, TokenProvider

__version__ = "0.1.0"

__all__ = [
    "AccessToken",
    "ApiError",
    "Candle",
    "CloseCode",
    "Connected",
    "Disconnected",
    "Dropped",
    "Gap",
    "NotEntitled",
    "PolicyViolation",
    "PricefeedClient",
    "PricefeedError",
    "ProtocolError",
    "Reset",
    "StreamEvent",
    "StreamRefused",
    "Symbol",
    "SyncPricefeedClient",
    "Tick",
    "TokenProvider",
    "Unauthorized",
    "UnknownSymbol",
]
