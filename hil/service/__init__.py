"""The mock OneNET OTA service: a real HTTP/1.1 server on loopback over ``hil.onenet``."""

from hil.service.http import BackgroundServer, HttpRequest, HttpResponse, HttpServer
from hil.service.mock import OtaService
from hil.service.timeline import Exchange, Timeline

__all__ = ["BackgroundServer", "Exchange", "HttpRequest", "HttpResponse", "HttpServer",
           "OtaService", "Timeline"]
