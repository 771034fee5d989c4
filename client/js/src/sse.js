/**
 * Server-sent events (the `text/event-stream` format) parsed from a byte stream: what
 * `POST /v1/generate` with `stream: true` answers.
 */

/**
 * Each event of the stream as `{event, data}` (`event` defaults to "message"; `data` joins the
 * event's data lines with "\n"). Comments and fields other than event/data are skipped.
 * @param {AsyncIterable<Uint8Array>} chunks
 * @returns {AsyncGenerator<{event: string, data: string}>}
 */
export async function* readEvents(chunks) {
  const text = new TextDecoder();
  let buffered = "";
  let event = "message";
  let data = [];
  for await (const chunk of chunks) {
    buffered += text.decode(chunk, { stream: true });
    let newline;
    while ((newline = buffered.search(/\r\n|\r|\n/)) !== -1) {
      if (newline === buffered.length - 1 && buffered.endsWith("\r")) break; // "\r\n" split?
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + (buffered.startsWith("\r\n", newline) ? 2 : 1));
      if (line === "") {
        if (data.length) yield { event, data: data.join("\n") };
        event = "message";
        data = [];
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
  }
}
