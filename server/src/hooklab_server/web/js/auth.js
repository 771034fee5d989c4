// The API key: kept in this browser's local storage (for this server's address only) and asked
// for with a dialog when the server needs one or refuses the one stored.

const STORAGE = "hooklab.apiKey";

export function getKey() {
  try {
    return localStorage.getItem(STORAGE) || "";
  } catch {
    return ""; // storage disabled: the page still works on an open server
  }
}

export function setKey(key) {
  if (key) localStorage.setItem(STORAGE, key);
  else localStorage.removeItem(STORAGE);
}

/**
 * Shows the key dialog with `reason` (why a key is needed, or why the stored one was refused);
 * resolves to true when a key was saved, false when the dialog was dismissed or the key
 * forgotten.
 */
export function askForKey(reason) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  input.value = getKey();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        if (dialog.returnValue === "save" && input.value.trim()) {
          setKey(input.value.trim());
          resolve(true);
        } else {
          if (dialog.returnValue === "forget") setKey("");
          resolve(false);
        }
      },
      { once: true },
    );
    dialog.showModal();
    input.focus();
  });
}
