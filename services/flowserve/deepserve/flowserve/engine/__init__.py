"""The engine: requests, step planning, the step loop and its asyncio face."""
