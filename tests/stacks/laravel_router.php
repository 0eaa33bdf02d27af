<?php
// A stand-in InvoisX that reads each request as a Laravel backend does (Illuminate's Request,
// method override on, as Laravel's kernel sets it) and answers with what it understood.
// Run as `php -S 127.0.0.1:PORT laravel_router.php`; every request is also appended, one
// JSON line each, to the file named by LARAVEL_SEEN.
require '/usr/share/php/Illuminate/Http/autoload.php';

use Illuminate\Http\Request;

Request::enableHttpMethodParameterOverride();
$request = Request::capture();
$headers = [];
foreach ($_SERVER as $name => $value) {
    if (str_starts_with($name, 'HTTP_') || str_starts_with($name, 'CONTENT_')) {
        $headers[$name] = $value;
    }
}
$seen = json_encode([
    'method' => $request->getMethod(),
    'real_method' => $request->getRealMethod(),
    'path' => $request->getPathInfo(),
    'is_json' => $request->isJson(),
    'input' => $request->request->all(),
    'headers' => $headers,
    'body_bytes' => strlen($request->getContent()),
]);
file_put_contents(getenv('LARAVEL_SEEN'), $seen . "\n", FILE_APPEND | LOCK_EX);
header('Content-Type: application/json');
echo $seen;
