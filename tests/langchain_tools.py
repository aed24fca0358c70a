"""The tool and the structured-output schema that the LangChain tests share (in-process plugin and server)."""
from __future__ import annotations

from langchain_core.tools import tool
from pydantic import BaseModel, Field


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 24 degrees Celsius in {city}."


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country the city is in")
