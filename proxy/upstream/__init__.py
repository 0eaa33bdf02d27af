"""The InvoisX side: forwarding a vetted call over kept-alive HTTP/1.1 connections."""
