"""The lab: experiments that test the article's claims using only normlab's public API."""
